"""Self-healing: the repair of queued copies and the scrub (docs/design.md, "Self-healing")."""
