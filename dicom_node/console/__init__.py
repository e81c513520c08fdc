"""Operator console: login (users, sessions, API tokens, CSRF), server-rendered pages, previews
of the AI results and a readiness check that tells the truth (`/readyz`)."""
