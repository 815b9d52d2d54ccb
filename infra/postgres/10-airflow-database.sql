-- Runs once, when the Postgres volume is first initialised: POSTGRES_DB creates the MLflow database, this the
-- Airflow one (same owner, POSTGRES_USER).
CREATE DATABASE airflow;
