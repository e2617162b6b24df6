-- Refresh the reporting views after the nightly load.
BEGIN;
INSERT INTO reporting.daily_revenue (day, revenue, orders)
SELECT date_trunc('day', created_at) AS day, sum(amount), count(*)
FROM staging.orders
GROUP BY 1
ON CONFLICT (day) DO UPDATE SET revenue = EXCLUDED.revenue, orders = EXCLUDED.orders;
COMMIT;

REFRESH MATERIALIZED VIEW CONCURRENTLY reporting.customer_lifetime_value;
ANALYZE reporting.daily_revenue;
