"""The adapters: the database (engine, models, schema, the stock ledger, the event
store, the operation row's statements), the microservice client, settings, logging setup,
notification senders. They import the domain and each other, never the services.
"""
