# kimibot: slim, non-root, with a healthcheck on /healthz (ready to answer) and /livez for orchestrators.
# Base pinned to Python's minor version and Debian's release: a rebuild picks up their security patches,
# never a new Python or Debian. Dependencies are pinned by requirements.lock (regenerate: scripts/lock).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY bot ./bot
COPY handlers ./handlers
RUN pip install --no-cache-dir --prefix=/install -c requirements.lock .

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PORT=3000
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 kimibot
USER 10001
WORKDIR /home/kimibot
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '3000'), timeout=4)"
# Stop grace: on SIGTERM running answers may finish for SHUTDOWN_GRACE_SECONDS (default 30 s), then the rest go
# back on the queue and the process exits within a few seconds more. Give it 40 s before SIGKILL:
# `docker stop -t 40`, compose `stop_grace_period: 40s`, Kubernetes `terminationGracePeriodSeconds: 40`.
LABEL org.kimibot.stop-grace-seconds="40"
STOPSIGNAL SIGTERM
CMD ["kimibot", "serve"]
