"""The worker's HTTP server: routes and auth (api), on-demand explanations,
what-if and global importance (explain)."""
