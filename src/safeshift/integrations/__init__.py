"""Integrations of safeshift into other frameworks' apps.

:mod:`safeshift.integrations.starlette` runs a rollout inside a Starlette or FastAPI app that
serves its own models, with the gateway's serving core and background tasks.
"""
