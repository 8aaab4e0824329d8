# kimibot: slim, non-root, with a healthcheck on /healthz.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY handlers ./handlers
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PORT=3000
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 kimibot
USER kimibot
WORKDIR /home/kimibot
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '3000'), timeout=4)"
# SIGTERM lets running answers finish (up to 30 s) before the process exits.
STOPSIGNAL SIGTERM
CMD ["kimibot", "serve"]
