#!/bin/sh
# Offer busybox:latest in this host's Docker engine: no image registry can be reached from a test host,
# so services are built FROM a scratch image made of the host's own static busybox.
set -eu
if docker image inspect busybox:latest >/dev/null 2>&1; then
    exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/bin" "$dir/sbin" "$dir/usr/bin" "$dir/usr/sbin" "$dir/tmp" "$dir/etc" "$dir/var/www"
chmod 1777 "$dir/tmp"
cp /bin/busybox "$dir/bin/busybox"
# Links made here rather than by `busybox --install -s`, which would point at the temporary dir.
for applet in $(/bin/busybox --list-full); do
    [ "$applet" = "bin/busybox" ] || [ -e "$dir/$applet" ] || ln -s /bin/busybox "$dir/$applet"
done
tar -C "$dir" --numeric-owner -c . | docker import --change 'CMD ["sh"]' - busybox:latest >/dev/null
