"""Nightly job: load the day's orders from the shop export into the staging schema."""
import csv
import os
import sys

import psycopg


def load(path: str, dsn: str) -> int:
    """Copy the CSV export at `path` into staging.orders; return the number of rows."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, open(path, newline="") as handle:
        cur.execute("TRUNCATE staging.orders")
        reader = csv.reader(handle)
        next(reader)  # header
        rows = 0
        with cur.copy("COPY staging.orders (id, customer_id, amount, created_at) FROM STDIN") as copy:
            for row in reader:
                copy.write_row(row)
                rows += 1
        return rows


if __name__ == "__main__":
    count = load(sys.argv[1], os.environ["WAREHOUSE_DSN"])
    print(f"loaded {count} orders")
