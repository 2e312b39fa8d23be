#!/bin/sh
# salt-cloud deploy script for guest images that already have Salt installed
# (offline hosts, golden images): installs the minion config, keys and grains
# that salt-cloud uploaded next to this script, sets the minion id, and
# (re)starts salt-minion. Nothing is downloaded.
#
# Use it with `script: salt-preinstalled` in a profile, after copying it to
# /etc/salt/cloud.deploy.d/. It takes bootstrap-salt.sh's -c DIR (where the
# files are; default: this script's directory) and ignores its other flags,
# so it can also stand in for bootstrap-salt.sh.
set -eu
DIR=$(cd "$(dirname "$0")" && pwd)
while getopts ":c:k:FKSMNPXUD" opt; do
  case "$opt" in
    c) DIR=$OPTARG ;;
    *) ;;
  esac
done

CONF=/etc/salt
install -d -m 755 "$CONF" "$CONF/minion.d"
install -d -m 700 "$CONF/pki/minion"
install -m 600 "$DIR/minion.pem" "$CONF/pki/minion/minion.pem"
install -m 644 "$DIR/minion.pub" "$CONF/pki/minion/minion.pub"
install -m 644 "$DIR/minion" "$CONF/minion"
if [ -f "$DIR/grains" ]; then install -m 644 "$DIR/grains" "$CONF/grains"; fi
rm -f "$CONF/minion_id"

if command -v systemctl >/dev/null 2>&1; then
  # --no-reload: the unit is the image's, loaded since boot; a plain enable
  # reloads the whole manager (about 2 s of a TCG guest's CPU, every deploy).
  # The link alone makes the next boots start it.
  systemctl --no-reload enable salt-minion >/dev/null 2>&1 || true
  systemctl restart salt-minion
else
  pkill -f salt-minion || true
  salt-minion -d
fi
