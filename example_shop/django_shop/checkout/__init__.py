"""The checkout app: a checkout request recorded in Django, its order placed on commit."""
