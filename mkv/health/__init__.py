"""The health process: probe decisions (probe), the checker loop that publishes volume
status and finishes pending deletes (checker), workers' failure reports (reporter)."""
