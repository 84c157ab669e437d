"""Multi-turn preference learning: losses, pair building, trainer and the online loop."""
