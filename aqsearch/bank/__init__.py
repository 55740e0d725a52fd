"""The candidate bank: scores of every (unit, scheme), and the one plan builder (:func:`build_plan`).

See :mod:`aqsearch.bank.core` (the bank), :mod:`aqsearch.bank.store` (an Optuna storage as its queue),
:mod:`aqsearch.bank.build` (building and racing) and :mod:`aqsearch.bank.race`.
"""

from aqsearch.bank.core import Bank, build_plan
from aqsearch.bank.records import MENU, BankConfig, Candidate
from aqsearch.bank.race import dominated

__all__ = ["MENU", "Bank", "BankConfig", "Candidate", "build_plan", "dominated"]
