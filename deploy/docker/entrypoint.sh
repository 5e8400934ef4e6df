#!/bin/sh
# Entrypoint of the aidc image: runs the service named by AIDC_SERVICE (python -m services.<name>).
# With arguments it runs them instead, e.g. `docker run IMAGE aidc config` or `aidc certs init`.
set -eu

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

case "${AIDC_SERVICE:-}" in
    auth | storage | training | scheduler | billing | serving)
        exec python -m "services.${AIDC_SERVICE}"
        ;;
    *)
        echo "aidc image: set AIDC_SERVICE to auth, storage, training, scheduler, billing or serving" >&2
        exit 64
        ;;
esac
