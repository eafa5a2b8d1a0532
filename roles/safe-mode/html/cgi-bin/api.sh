#!/bin/sh
# The safe-mode page's status API: GET /cgi-bin/api.sh/status, /health or /metrics relays the
# updater's own endpoint on 127.0.0.1:9731, its status line and body as they are (busybox
# httpd passes a CGI answer that starts with "HTTP/" through). Nothing else is relayed: the
# updater's POST /check-now stays on the device.
case "$REQUEST_METHOD $PATH_INFO" in
  "GET /status" | "GET /health" | "GET /metrics") ;;
  *)
    printf 'Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\n'
    printf 'the status API answers GET /cgi-bin/api.sh/status, /health and /metrics\n'
    exit 0
    ;;
esac
printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$PATH_INFO" | nc 127.0.0.1 9731 ||
  printf 'Status: 502 Bad Gateway\r\nContent-Type: text/plain\r\n\r\nthe updater does not answer\n'
