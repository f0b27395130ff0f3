"""Reef's discrete, retryable jobs on rq: export a tenant's scored turns (JSONL and a
Hugging Face ``datasets`` layout), replay an export into a namespace's ``scored`` stream,
re-mine a session's failing turns for skills.

Modules: ``tasks`` (the job functions rq runs), ``dataset`` (the export's formats, written
atomically), ``remine`` (the skill-miner's step, on demand), ``queue`` (the queue and
``enqueue``), ``worker`` (rq's ``SimpleWorker`` with metrics); ``python -m services.jobs``
runs a worker. ``reef jobs ...`` (``services/stack/jobs_cli.py``) enqueues or runs them.
"""
