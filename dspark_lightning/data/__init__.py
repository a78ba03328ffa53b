"""Data: conversations, chat templates and loss masks; target caches; DataModules."""
