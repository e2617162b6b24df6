#!/bin/sh
# Deploy the ingestion service: run migrations, then restart the workers one by one.
set -eu
cd /srv/ingestion
git fetch --tags
git checkout "$1"
./bin/migrate --database "$WAREHOUSE_DSN" up
for worker in 1 2 3; do
    systemctl restart "ingestion-worker@$worker"
    sleep 10
    systemctl is-active --quiet "ingestion-worker@$worker" || { echo "worker $worker failed" >&2; exit 1; }
done
echo "deployed $1"
