/**
 * A minimal typed event emitter. `Events` maps each event name to the tuple
 * of arguments its listeners receive.
 */
export declare class Emitter<Events extends {
    [name: string]: any[];
}> {
    private _listeners;
    /** Adds a listener; returns a function that removes it again. */
    on<K extends keyof Events>(event: K, listener: (...args: Events[K]) => void): () => void;
    /** Removes a listener added with `on`. */
    off<K extends keyof Events>(event: K, listener: (...args: Events[K]) => void): void;
}
