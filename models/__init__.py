"""Model families, one package each: ``from dsf.models import digits``."""
