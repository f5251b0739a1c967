# cws.sensor_mt: the Mersenne Twister of CPython's random module, so a simulated sensor's seeded
# random walk gives the CPython agent's values; imported only for the "random" pattern.


class MT:
    # MT19937 exactly as CPython's random.Random(seed) (init_by_array over the seed's 32-bit
    # words, genrand_res53): 2.5 KB of state, allocated only for the "random" pattern.

    def __init__(self, seed):
        from array import array

        n = abs(seed)
        key = []
        while n:
            key.append(n & 0xFFFFFFFF)
            n >>= 32
        if not key:
            key = [0]
        mt = array("I", bytes(2496))
        mt[0] = 19650218
        for i in range(1, 624):
            p = mt[i - 1]
            mt[i] = (1812433253 * (p ^ (p >> 30)) + i) & 0xFFFFFFFF
        i, j = 1, 0
        for _ in range(max(624, len(key))):
            p = mt[i - 1]
            mt[i] = ((mt[i] ^ ((p ^ (p >> 30)) * 1664525)) + key[j] + j) & 0xFFFFFFFF
            i += 1
            j += 1
            if i >= 624:
                mt[0] = mt[623]
                i = 1
            if j >= len(key):
                j = 0
        for _ in range(623):
            p = mt[i - 1]
            mt[i] = ((mt[i] ^ ((p ^ (p >> 30)) * 1566083941)) - i) & 0xFFFFFFFF
            i += 1
            if i >= 624:
                mt[0] = mt[623]
                i = 1
        mt[0] = 0x80000000
        self.mt = mt
        self.i = 624

    def u32(self):
        mt = self.mt
        if self.i >= 624:
            for k in range(624):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.i = 0
        y = mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def random(self):
        a = self.u32() >> 5
        b = self.u32() >> 6
        return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)

    def uniform(self, a, b):
        return a + (b - a) * self.random()
