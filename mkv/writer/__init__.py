"""The writer process: wire protocol (protocol), the group-committing server (server),
the client every other process uses (client), and the process entry (__main__)."""
