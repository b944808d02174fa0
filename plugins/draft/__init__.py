"""The draft stage's commands: ``charfw adopt`` moves chosen candidates into the sources."""
