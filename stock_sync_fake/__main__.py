"""`python -m stock_sync_fake --port 8765`: the same as `stock-sync fake-microservice`."""

from stock_sync_fake.command import fake_microservice

if __name__ == "__main__":
    fake_microservice(prog_name="python -m stock_sync_fake")
