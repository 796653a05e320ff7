from services.generator.worker import main

main()
