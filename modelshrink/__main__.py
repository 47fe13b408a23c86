"""``python -m modelshrink``."""

from modelshrink._entry import main

if __name__ == "__main__":
    main()
