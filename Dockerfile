# ollamabalancer in a container (see "Running it as a service" in docs/operations.md):
#   docker build -t ollamabalancer .
#   docker run -d -p 8080:8080 -v ollamabalancer-data:/data \
#       -v "$PWD/admin-token:/run/secrets/admin-token:ro" \
#       -e ADMIN_TOKEN_FILE=/run/secrets/admin-token ollamabalancer
FROM python:3.12-slim

# An unprivileged user that owns nothing but the data volume.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin balancer \
    && install -d -o balancer -g balancer -m 700 /data

COPY pyproject.toml README.md ollamabalancer.py /src/
RUN pip install --no-cache-dir "/src[mysql,socks,fast]" && rm -rf /src

# The database and the key generated on first start live on the volume.
ENV IP=0.0.0.0 \
    PORT=8080 \
    DB_PATH=/data/ollamabalancer.db \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
WORKDIR /data
USER balancer
EXPOSE 8080
STOPSIGNAL SIGTERM
# On the port the container serves, whatever PORT says.
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/' % os.environ.get('PORT', '8080'), timeout=4)"]
CMD ["ollamabalancer"]
