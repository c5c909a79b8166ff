"""Environments for multi-turn rollouts: the interface, built-in tool environments, tools and their sandbox."""
