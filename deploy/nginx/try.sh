#!/usr/bin/env bash
# Try the shipped NGINX config on this machine, as you, in the foreground (Ctrl-C stops it):
# serves ROOT (default: this checkout's ./data, where shards.example.yaml records) and the
# history page (deploy/www/) on 127.0.0.1:PORT (default 8080). Nothing is installed or changed
# outside a temporary directory. For a real server, install deploy/nginx/shardlog.conf instead
# (docs/deploy.md).
#
#   deploy/nginx/try.sh [PORT] [ROOT]
#   open http://127.0.0.1:8080/+www/?topic=chat/room42
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
port=${1:-8080}
root=$(cd "${2:-$here/data}" 2>/dev/null && pwd) \
    || { echo "try.sh: ${2:-$here/data} does not exist yet: record something first" >&2; exit 66; }
nginx=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx" ] || { echo "try.sh: nginx is not installed (Debian/Ubuntu: apt-get install nginx-light)" >&2; exit 69; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/shardlog-nginx.XXXXXX")
pid=""
# (|| true: under set -e a failed kill, nginx already gone after the same Ctrl-C, made the exit 1, not 130)
trap '[ -z "$pid" ] || { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" || true; }; rm -rf "$tmp"' EXIT
interrupted=""
trap 'interrupted=1' INT TERM  # Ctrl-C: exit 130 below, also when nginx (same group) exits first
# the shipped config, pointed at ROOT and deploy/www/ (both of its roots become ROOT: the example
# map writes every shard there)
sed -e "s|listen 80;|listen 127.0.0.1:$port;|" -e '/listen \[::\]:80;/d' \
    -e "s|root /srv/shardlog/disk1;|root $root;|" -e "s|root /srv/shardlog/data;|root $root;|" \
    -e "s|alias /srv/shardlog/www/;|alias $here/deploy/www/;|" \
    "$here/deploy/nginx/shardlog.conf" > "$tmp/shardlog.conf"
# root's nginx workers would run as nobody, who may not read a home directory
user=""; [ "$(id -u)" = 0 ] && user="user root;"
cat > "$tmp/nginx.conf" <<EOF
$user
worker_processes 1;
pid $tmp/nginx.pid;
error_log stderr;
events {}
http {
    access_log off;
    log_not_found off;          # the browser's /favicon.ico
    client_body_temp_path $tmp/body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;
    include $tmp/shardlog.conf;
}
EOF
"$nginx" -t -q -e stderr -p "$tmp" -c "$tmp/nginx.conf"
echo "serving $root on http://127.0.0.1:$port/  history page: http://127.0.0.1:$port/+www/?topic=chat/room42" >&2
"$nginx" -e stderr -p "$tmp" -c "$tmp/nginx.conf" -g 'daemon off;' &
pid=$!
status=0
wait "$pid" || status=$?
[ -z "$interrupted" ] || exit 130
exit "$status"
