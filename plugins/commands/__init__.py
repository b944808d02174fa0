"""Commands that are not a build stage: image collection and caption-file tools."""
