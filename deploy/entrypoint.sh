#!/bin/sh
# Entrypoint of Reef's images: drop the Reef variables that are set but empty, then run
# the command. Compose passes every optional setting of .env (an unset REEF_PRM_API_KEY
# arrives as ""), and Reef's settings read "" as a value: an empty secret is refused as a
# placeholder and an empty URL is not "unset". Unset, each takes its documented default.
set -eu
for name in $(env | sed -n 's/^\(REEF_[A-Za-z0-9_]*\|AZURE_OPENAI_[A-Za-z0-9_]*\|TINKER_[A-Za-z0-9_]*\)=$/\1/p'); do
    unset "$name"
done
exec "$@"
