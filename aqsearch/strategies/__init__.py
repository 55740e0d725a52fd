"""Strategies: each ``(bank, limit, ...) -> Plan``, building plans through :meth:`aqsearch.bank.Bank.plan`.

- :func:`aqsearch.strategies.knapsack.knapsack`: least summed bank error within the budget, exact bytes;
- :func:`aqsearch.strategies.progressive.progressive`: 8 -> 4 -> 3 -> 2 per block behind gates, journaled;
- :func:`aqsearch.strategies.study.study`: an Optuna study over the bank's units (imports optuna).

Imported lazily (``aqsearch.strategies.study`` needs the search extra).
"""
