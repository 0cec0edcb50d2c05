#!/usr/bin/env sh
# Talk to a local tollgate with curl. Usage: examples/curl.sh [BASE_URL]
BASE=${1:-http://127.0.0.1:8080}
set -x
curl -s "$BASE/v1/models"
curl -s "$BASE/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "demo-chat", "messages": [{"role": "user", "content": "Hello!"}]}'
curl -sN "$BASE/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "demo-chat", "stream": true, "messages": [{"role": "user", "content": "Hello!"}]}'
