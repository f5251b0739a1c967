# CWSNet home-lab image: one image, every daemon (`cwsnet cloud|gateway|agent|init`).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cwsnet ./cwsnet
COPY edge_agent ./edge_agent
COPY gateway ./gateway
COPY cloud ./cloud
COPY policies ./policies
RUN pip install --no-cache-dir . && useradd --system --home /data cwsnet && mkdir -p /data && chown cwsnet /data
USER cwsnet
VOLUME ["/data"]
# MQTT over TLS (site broker, cloud broker) and the console; plaintext MQTT stays on loopback
EXPOSE 8883 8884 8080
ENTRYPOINT ["cwsnet"]
CMD ["--help"]
