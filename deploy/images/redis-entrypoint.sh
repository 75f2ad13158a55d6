#!/bin/sh
# As the official image does: started without a config file, Redis's protected mode would refuse
# every client from another container, so turn it off; who may connect is the network's business.
set -e
if [ "$1" = redis-server ]; then
    shift
    case "${1:-}" in
        *.conf) conf=$1; shift; set -- redis-server "$conf" --protected-mode no "$@" ;;
        *) set -- redis-server --protected-mode no "$@" ;;
    esac
fi
exec "$@"
