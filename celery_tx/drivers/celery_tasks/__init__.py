"""The Celery driver: participants are Celery tasks journaled around the user's function
(``CeleryDriver``; ``@participant`` declares them)."""
