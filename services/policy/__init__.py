"""The access-policy service: versioned, signed Cedar policies deciding what each office may consume.

Core (pure): ``model``, ``version``, ``compiled``, ``engine``. Shell: ``pack`` (files), ``topic`` (Kafka),
``service`` (HTTP), ``settings``, ``__main__``. See docs/policy.md.
"""
