"""Tests of the rule-based rewards in reward_rules/."""
