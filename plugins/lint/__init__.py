"""Linters for the lint stage: checks of each part's training material before it trains."""
