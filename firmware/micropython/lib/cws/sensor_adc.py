# cws.sensor_adc: an analog input (machine.ADC), calibrated microvolts where the port has them.
from cws.sensor import Sensor, _hardware, _machine


class Adc(Sensor):
    # value = volts * scale + offset, volts from read_uv() (calibrated, ESP32) averaged over
    # "samples" reads, or from read_u16() * vref / 65535 on ports without read_uv

    kind = "adc"

    def __init__(self, c, index):
        self._common(c, index)
        pin = c.int("pin", c.REQ, 0, 63)
        self.field = c.name("field", "value")
        atten = c.choice("atten", c.ATTENS, 11)
        self.scale = c.num("scale", 1.0)
        self.offset = c.num("offset", 0.0)
        self.samples = c.int("samples", 4, 1, 64)
        self.vref = c.num("vref", 3.3, positive=True)
        self.digits = c.int("digits", 4, 0, 6)
        c.done()
        m = _machine(self.name)
        self._adc = adc = _hardware(self.name, m.ADC, _hardware(self.name, m.Pin, pin))
        a = getattr(m.ADC, ("ATTN_0DB", "ATTN_2_5DB", "ATTN_6DB", "ATTN_11DB")[c.ATTENS.index(atten)], None)
        if a is not None and hasattr(adc, "atten"):
            _hardware(self.name, adc.atten, a)
        self._uv = hasattr(adc, "read_uv")

    def read(self, now_s):
        n = self.samples
        total = 0
        try:
            for _ in range(n):
                total += self._adc.read_uv() if self._uv else self._adc.read_u16()
        except OSError as e:
            raise self.fail("ADC read failed", e)
        volts = total / n / 1000000 if self._uv else total / n * self.vref / 65535
        return {self.field: round(volts * self.scale + self.offset, self.digits)}


