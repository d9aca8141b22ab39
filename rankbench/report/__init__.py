"""Reading tracked runs back: run tables (``tables``), mean±std reports with statistics (``build``), figures."""
