from services.trainer.worker import main

main()
