"""Agents written against the OpenAI API, for task.agent (asyncrl/generator/endpoint.py)."""
