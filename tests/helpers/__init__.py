"""Test helpers: running commands as users do (:mod:`.runner`), training runs (:mod:`.training`), real assets."""
