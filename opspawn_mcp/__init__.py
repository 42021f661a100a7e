"""opspawn ops-core: the MCP-native orchestrator (server, scheduler, workers, host pool)."""
