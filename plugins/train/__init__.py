"""The trainer (``lora``) and the commands around it (``charfw train``, ``charfw export-model``)."""
