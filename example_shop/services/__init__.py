"""The shop's four services. Each owns its database and exposes participants."""
