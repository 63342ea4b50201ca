"""user_service: the example service lagompy's docs build step by step."""
