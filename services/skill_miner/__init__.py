"""The skill-miner: learns skills from the turns that went wrong (``enable_skill_evolution``).

It consumes ``scored`` in its own consumer group (``skill-miner``). For each scored turn
it keeps the session's recent turns, credits the skills injected into the turn (and the
comparable ones that were not) and retires skills that keep hurting; for a turn whose
reward is below ``skill_update_threshold`` it asks an LLM to diagnose the session and
propose at most ``max_new_skills`` skills as strict JSON, then rejects unsafe proposals,
redacts secrets and personal data, merges near-duplicates into existing skills and adds the
rest as candidates (or active, with ``skill_auto_promote``).

Modules: ``service`` (the handler), ``llm`` (the LLM and its JSON), ``proposals`` (the
answer's schema), ``prompts``, ``curate`` (safety, redaction, merge, gate), ``safety``,
``similarity``, ``credit``, ``trajectory``, ``metrics``.
"""
