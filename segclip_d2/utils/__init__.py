"""Small shared helpers: atomic writes, event files, hardware facts, class colours."""
