package dispatch_test

import (
	"context"
	"errors"
	"fmt"
	"log"

	"github.com/dispatch-run/dispatch/clients/go/dispatch"
	"github.com/dispatch-run/dispatch/clients/go/dispatchv1"
)

// The README's first example: stream a turn. (Compiled, not run: it needs a server.)
func Example() {
	ctx := context.Background()
	client, err := dispatch.New() // DISPATCH_ADDRESS and DISPATCH_API_KEY (or .dispatch/api_key)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	conv, err := client.CreateConversation(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	for event, err := range client.RunTurn(ctx, &dispatchv1.SendRequest{ConversationId: conv.GetId(), Text: "list the workspace"}) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Print(event.GetTextDelta().GetText())
	}
}

func ExampleClient_Subscribe() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client, err := dispatch.New(dispatch.WithAddress("127.0.0.1:7600"))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	// History after event 41 up to now, then the stream ends (it resubscribes by itself if it breaks).
	for event, err := range client.Subscribe(ctx, "conv_...", dispatch.After(41), dispatch.Until(dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_CAUGHT_UP)) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(event.GetEventSeq(), event.GetKind())
	}
}

func ExampleError() {
	client, err := dispatch.New()
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	_, err = client.GetConversation(context.Background(), "conv_missing")
	var e *dispatch.Error
	switch {
	case errors.Is(err, dispatch.ErrNotFound):
		fmt.Println("no such conversation")
	case errors.As(err, &e):
		fmt.Println(dispatch.CodeName(e.Code), e.Message)
	}
}
