#!/bin/sh
# The behaviour of the official redis image's entrypoint, written for the local test image
# (what is and is not reproduced: tests/stack/recipes/README.md).
set -e
# A first argument that is a flag or a .conf file means redis-server.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- redis-server "$@"
fi
# As root: hand the working directory to redis and drop to it (gosu).
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
  find . \! -user redis -exec chown redis '{}' +
  exec gosu redis "$0" "$@"
fi
# Files the server creates are private unless the caller set a umask of its own.
um="$(umask)"
if [ "$um" = 0022 ]; then
  umask 0077
fi
exec "$@"
