"""The scorer: a reward for every turn, from a judge and from what the user does next."""
